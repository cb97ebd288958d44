"""vlatune: fine-tune and evaluate Vision-Language-Action robot policies (LIBERO and your data).

$ vlatune --help
"""

__version__ = "0.1.0"
