"""Functions the command-line tests store calls of (importable, so records name a real module)."""

from __future__ import annotations

import numpy as np

from fleche import fleche


@fleche
def square(x):
    return x * x


@fleche(version="2")
def simulate(temperature, label="run", steps=3):
    return {"temperature": temperature, "trace": np.linspace(0.0, temperature, steps)}
