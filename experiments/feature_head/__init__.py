"""An experiment, not shipped: a context-reading feature head (EAGLE-style), its drafter and
its training. Results and the verdict: docs/research.md, "A context-reading feature head".

    python -m feature_head.train --data DISTILL_DIR --out FOLDER      (from experiments/)
"""
