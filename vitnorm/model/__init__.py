"""The ViT and everything that rewrites it: norms (chosen by name), the ViT, BN folding, reference weights."""
