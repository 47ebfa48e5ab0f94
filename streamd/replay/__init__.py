"""`streamd replay`: archived procedures (or any video) through one or two models, on the daemon's own pipeline.

run.py     each model over the sources, as the daemon runs files (as fast as they decode, batch 1, no wall
           clock in the messages), writing its detection logs under OUT/<model name>/, with a progress bar
logs.py    those logs read back: frames, boxes, tracks
compare.py agreement between two models per frame, and the findings (confirmed tracks) only one of them made
truth.py   ground truth (JSON lines, one per annotated frame): AP50 over frames and the clinical figures
report.py  OUT/report.json and the self-contained OUT/report.html (inline SVG timelines, thumbnails)
"""
