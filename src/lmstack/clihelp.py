"""What every layer's ``cli.py`` shares, in a leaf module so that no layer imports :mod:`lmstack.cli`."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in epilogs as written and shows defaults."""
