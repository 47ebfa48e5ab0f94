"""Threads, bounded queues and the wiring that runs the stages."""
