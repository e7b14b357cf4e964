"""Training of the drafting side: self-distillation data, draft heads, rescorers."""
