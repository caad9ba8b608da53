"""The registry of blocking methods: one module per method, each defining `METHOD`, a
`blockem.methods.base.Method`. A new method is a new module here plus its line in `MODULES`
(and its name in the config schema's method enum, which tests/test_methods.py checks).

    from blockem import methods
    methods.get("kpos_only").derive(pairs, seed)
"""

from blockem.methods import (blockem, caft, direction, epochs, freeze_above, inoculation, kl,
                             kneg_only, kpos_only, mix, preventative_steering, random_set,
                             shuffled_signs, topdelta)
from blockem.methods.base import ConfigView, Method, TrainContext

# registry order: the schema's enum order (and of listings in messages)
MODULES = (blockem, kl, random_set, topdelta, kpos_only, kneg_only, shuffled_signs, direction,
           freeze_above, epochs, caft, preventative_steering, inoculation, mix)
REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in MODULES}


def names() -> tuple[str, ...]:
    """Every method's name, in registry order."""
    return tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called `name`; a ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown block method {name!r}; choose from "
                         f"{', '.join(names())}") from None


def listing(names_: list[str] | tuple[str, ...]) -> str:
    """'method a' / 'a and b' / 'a, b and c' (for messages)."""
    names_ = list(names_)
    if len(names_) == 1:
        return f"method '{names_[0]}'"
    return ", ".join(names_[:-1]) + f" and {names_[-1]}"


# what the grid's `lambdas` of a method are, by `Method.strength` (a module's docstring says more)
STRENGTH_WORDS = {"lambda": "penalty weight", "alpha": "steering strength",
                  "fraction": "a fraction, in [0, 1]"}


def markdown_table() -> str:
    """The registry as the markdown table of config/README.md (a test keeps them equal)."""
    rows = ["| method | blocks | `lambdas` are | lambda 0 | extra grid keys | what it is |",
            "|---|---|---|---|---|---|"]
    for m in REGISTRY.values():
        if m.needs == "latents":
            what = "the selected set" if m.latent_set == "main" else f"the `{m.latent_set}` set"
            what += ", derived" if m.derive else ""
        else:
            what = {"direction": "the mean-difference direction",
                    "aligned_data": "nothing (adds aligned chats)"}.get(m.needs, m.needs)
        zero = "the `sft` cell" if m.sft_at_zero else "a run of its own"
        keys = ", ".join(f"`{k}`" for k in m.grid_fields) or "-"
        strength = m.strength_doc or STRENGTH_WORDS[m.strength]
        rows.append(f"| `{m.name}` | {what} | {strength} | {zero} | {keys} | {m.doc} |")
    return "\n".join(rows)


__all__ = ["REGISTRY", "ConfigView", "Method", "TrainContext", "get", "names", "listing",
           "markdown_table"]
