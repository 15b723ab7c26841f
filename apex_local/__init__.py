"""apex-local: distributed deep Q-learning (Ape-X, R2D2, Gorila) as real processes on one box."""
__version__ = "0.1.0"
