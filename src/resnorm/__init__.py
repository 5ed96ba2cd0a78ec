"""ResNet (6n+2) with from-scratch normalization layers."""
