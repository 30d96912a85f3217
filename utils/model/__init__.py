"""Models: timm ViTs with DINO's backbone API, the DINO head and its weight-normalised last layer, loading weights."""
