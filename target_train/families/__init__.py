"""One module per model family: its re-initialization, grad masks and deploy folding (``target_train/handler.py`` dispatches)."""
