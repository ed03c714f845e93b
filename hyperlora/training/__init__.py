"""Training (SFT through the frozen base model, reconstruction) and evaluation of the hypernetwork."""
