"""DINO's multi-crop augmentation: its settings (config), per image on PIL (per_image), its random parameters
(params), the batched version on tensors (batched, color, workspace, transfer) and its compiled CPU kernels."""
