"""advgkl: adversarial training and robustness evaluation with the Generalized KL loss."""

__version__ = "0.1.0"
