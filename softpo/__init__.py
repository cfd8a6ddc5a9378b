"""softpo: Soft Preference Optimization (SPO) and DPO-family preference alignment."""

__version__ = "0.1.0"
