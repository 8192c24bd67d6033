"""Fit each GPU family's FP8/FP4 GEMM and attention efficiencies to the fit split of the published runs.

    python benchmarks/fit_published.py            # fit, print the coefficients and the errors per split

The coefficients this prints are what shared/uniap/cluster/devices.py declares for the family, with this
script named as their source; the validation and held-out splits are priced with them but never fitted.
Minimises the mean squared log error of tokens/s per GPU over the family's fit rows (Nelder-Mead).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

from scipy.optimize import minimize

import published_runs as corpus
from uniap.cluster import devices

# The families fitted (keys of DEVICE_COEFFICIENTS sharing one set of coefficients) and the fields fitted: the
# FP8 GEMM and attention efficiencies always, the MXFP8 and NVFP4 GEMMs' where the family's fit rows ran them.
FAMILIES = {"H100": ("H100",), "B200": ("B200", "GB200"), "B300": ("B300", "GB300")}
FIELDS = ("gemm_fp8", "attention")
FIELD_OF_RECIPE = {"mxfp8": "mxfp8_gemm", "nvfp4": "gemm_fp4"}
BOUNDS = (0.05, 1.0)


def family_rows(rows: list[tuple[str, bool, dict]], keys: tuple[str, ...]) -> list[tuple[str, bool, dict]]:
    return [r for r in rows if any(r[2]["gpu"].upper().startswith(k) for k in keys)]


def set_family(keys: tuple[str, ...], values: dict[str, float]) -> None:
    """Price with these coefficients for the family (the table uniap's clusters read them from)."""
    for key in keys:
        devices.DEVICE_COEFFICIENTS[key] = replace(devices.DEVICE_COEFFICIENTS[key], **values)


def fields_of(rows: list[tuple[str, bool, dict]]) -> tuple[str, ...]:
    """The coefficients these rows determine: FIELDS, and the GEMM fraction of each recipe they ran."""
    recipes = {row.get("recipe") for _, _, row in rows}
    return FIELDS + tuple(field for recipe, field in FIELD_OF_RECIPE.items() if recipe in recipes)


def loss(x, keys, rows, fields) -> float:
    values = dict(zip(fields, (min(max(v, BOUNDS[0]), BOUNDS[1]) for v in x)))
    set_family(keys, values)
    errors = []
    for source, held_out, row in rows:
        priced = corpus.price_row(source, held_out, row)
        if priced.predicted is not None:
            errors.append(math.log(priced.predicted / priced.measured) ** 2)
    return sum(errors) / max(1, len(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    all_rows = corpus.load_rows()
    for name, keys in FAMILIES.items():
        rows = [r for r in family_rows(all_rows, keys) if corpus.split_of(r[2], r[1]) == corpus.FIT]
        if not rows:
            continue
        fields = fields_of(rows)
        # Started below the upper bound: Nelder-Mead's first simplex steps up, where the bound flattens the loss.
        start = [min(getattr(devices.DEVICE_COEFFICIENTS[keys[0]], f), 0.9) for f in fields]
        options = {"xatol": 1e-3, "fatol": 1e-6}
        result = minimize(loss, start, args=(keys, rows, fields), method="Nelder-Mead", options=options)
        fitted = dict(zip(fields, (round(min(max(v, BOUNDS[0]), BOUNDS[1]), 3) for v in result.x)))
        set_family(keys, fitted)
        print(f"{name}: {fitted} on {len(rows)} fit rows, rms log error {math.sqrt(result.fun):.3f}")
    corpus.print_table(corpus.price_corpus())
    return 0


if __name__ == "__main__":
    sys.exit(main())
