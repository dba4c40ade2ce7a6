"""The settings half of the family registry: each OeMDM family's name and the rules on its settings.

A ``FamilySpec`` says, for one ``diffusion.name``, which rules its ``diffusion.*`` settings must
obey (e.g. LoMDM's c1 > c2 >= 0, method.md §3.2), whether it learns its forward schedule (then
RLOO needs K >= 2 corruptions, method.md §3.4) and whether it has order logits. ``FAMILY_SPECS``
is the one list of family names.

Why the rules live here, in layer 0, and not next to the math in ``diffusion/`` (layer 1): the
config is validated when it is loaded (``load_config`` names the key of a bad value before anything
is built), and docs/design.md §10b lets ``config/`` import nothing above it — not lazily, and not
through the package root either (tests/unit/test_import_graph.py). So the family's *settings
schema* sits at the bottom and both sides ask it:

- ``schema.DiffusionConfig`` / ``schema.Config`` look the name up here and report the first
  broken rule as ``config: KEY: MESSAGE``;
- each ``DiffusionFamily`` subclass names its spec (``spec = LOMDM``) and its constructor checks
  the same rules on its own arguments (``FamilySpec.check``, ``ValueError("KEY: MESSAGE")``);
- ``diffusion.registry.FAMILIES`` is keyed by ``cls.spec.name`` and checks that it covers exactly
  ``FAMILY_SPECS``, so a family cannot be added on one side only.

Each rule is therefore written once. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Settings = Mapping[str, Any]


@dataclass(frozen=True)
class Rule:
    """One constraint on ``diffusion.*`` settings.

    Attributes:
        key: The config key a violation names.
        reads: The settings the rule reads. It is checked only when all of them are given: a
            family constructor passes only its own arguments, and the diffusion section alone has
            no ``seq_length`` (``schema.Config`` adds it once ``model.seq_length`` is known).
        holds: The predicate.
        says: The message of a violation, from the family name and the settings.
    """

    key: str
    reads: tuple[str, ...]
    holds: Callable[[Settings], bool]
    says: Callable[[str, Settings], str]

    def violation(self, family: str, settings: Settings) -> str | None:
        """The message if the settings break the rule, else None (also when a read setting is missing)."""
        if any(name not in settings for name in self.reads) or self.holds(settings):
            return None
        return self.says(family, settings)

    def check(self, family: str, **settings: Any) -> None:
        """Raise ``ValueError("KEY: MESSAGE")`` if the settings break the rule."""
        message = self.violation(family, settings)
        if message is not None:
            raise ValueError(f"{self.key}: {message}")


def _at_least_two(k: Any) -> bool:
    return not isinstance(k, bool) and int(k) == k and k >= 2


SPREAD = Rule(
    "diffusion.c1", ("c1", "c2"), lambda s: s["c1"] > s["c2"] >= 0,
    lambda name, s: f"{name} needs diffusion.c1 > diffusion.c2 >= 0, got c1={s['c1']}, c2={s['c2']}",
)
"""Exponents c1 + c2 NormSig(.) lie in (c1 - c2, c1 + c2) subset (0, inf) (method.md §3.2, "Prop. C.3")."""

POSITIVE_C1 = Rule(
    "diffusion.c1", ("c1",), lambda s: s["c1"] > 0,
    lambda name, s: f"{name} needs diffusion.c1 > 0, got c1={s['c1']}" + (f", c2={s['c2']}" if "c2" in s else ""),
)
"""A constant power schedule 1 - t^c1 needs c1 > 0."""

RLOO_CORRUPTIONS = Rule(
    "diffusion.num_corruptions", ("num_corruptions",), lambda s: _at_least_two(s["num_corruptions"]),
    lambda name, s: (f"{name} learns its forward schedule with RLOO and needs K >= 2 "
                     f"(diffusion.num_corruptions >= 2), got {s['num_corruptions']!r}"),
)
"""The leave-one-out baseline needs another corruption of the same (x, t) (method.md §3.4)."""

SOME_CORRUPTIONS = Rule(
    "diffusion.num_corruptions", ("num_corruptions",), lambda s: s["num_corruptions"] >= 1,
    lambda name, s: f"must be >= 1, got {s['num_corruptions']}",
)
"""Families without RLOO ignore K (they use 1), but the key must still make sense."""

BLOCKS_DIVIDE = Rule(
    "diffusion.block_size", ("block_size", "seq_length"),
    lambda s: s["block_size"] >= 1 and s["seq_length"] % s["block_size"] == 0,
    lambda name, s: (f"{s['block_size']} does not divide model.seq_length={s['seq_length']}" if s["block_size"] >= 1
                     else f"must be a positive divisor of model.seq_length={s['seq_length']}, got {s['block_size']}"),
)
"""Slot families noise consecutive blocks of block_size positions (method.md §2)."""


def _order_families() -> str:
    return ", ".join(name for name, spec in FAMILY_SPECS.items() if spec.has_order_logits)


FROZEN_ORDER = Rule(
    "diffusion.learn_order", ("learn_order",), lambda s: bool(s["learn_order"]),
    lambda name, s: f"only the {_order_families()} family has order logits to freeze (name={name})",
)
NO_ORDER_LOGITS = Rule(
    "diffusion.order_logits", ("order_logits",), lambda s: not s["order_logits"],
    lambda name, s: f"only the {_order_families()} family has order logits (name={name})",
)


def _never(settings: Settings) -> bool:
    return False


def _always(settings: Settings) -> bool:
    return True


@dataclass(frozen=True)
class FamilySpec:
    """The settings schema of one OeMDM family.

    Attributes:
        name: Its ``diffusion.name``.
        rules: Its own rules on the schedule constants, checked in order.
        learns_forward: Whether the settings make its forward schedule learnable by RLOO (then
            K >= 2); otherwise it ignores ``diffusion.num_corruptions`` and uses K = 1.
        has_order_logits: It has order logits (``diffusion.learn_order``/``order_logits`` apply).
    """

    name: str
    rules: tuple[Rule, ...] = ()
    learns_forward: Callable[[Settings], bool] = _never
    has_order_logits: bool = False

    def problem(self, settings: Settings) -> tuple[str, str] | None:
        """The first rule the settings break, as ``(key, message)``, or None.

        Order: the family's rules, K, then the order-logit keys.
        """
        rules = [*self.rules, RLOO_CORRUPTIONS if self.learns_forward(settings) else SOME_CORRUPTIONS]
        if not self.has_order_logits:
            rules += [FROZEN_ORDER, NO_ORDER_LOGITS]
        for rule in rules:
            message = rule.violation(self.name, settings)
            if message is not None:
                return rule.key, message
        return None

    def check(self, **settings: Any) -> None:
        """Raise ``ValueError("KEY: MESSAGE")`` for the first broken rule (family constructors)."""
        found = self.problem(settings)
        if found is not None:
            raise ValueError(f"{found[0]}: {found[1]}")


MDLM = FamilySpec("mdlm")
POLY = FamilySpec("poly", rules=(POSITIVE_C1,))
ARM = FamilySpec("arm")
BD3LM = FamilySpec("bd3lm", rules=(BLOCKS_DIVIDE,))
GENMD4 = FamilySpec("genmd4", learns_forward=_always)
LOMDM = FamilySpec("lomdm", rules=(SPREAD,), learns_forward=_always)
MULTIVARIATE = FamilySpec("multivariate", rules=(SPREAD,), has_order_logits=True,
                          learns_forward=lambda s: bool(s.get("learn_order", True)))

FAMILY_SPECS: dict[str, FamilySpec] = {
    spec.name: spec for spec in (MDLM, POLY, ARM, BD3LM, GENMD4, LOMDM, MULTIVARIATE)
}
"""Every ``diffusion.name``, in the order error messages list them."""
