"""A registered version's differential privacy: its (ε, δ) as tags and a line of its description, and the
ε the `max_epsilon` promotion gate reads back (a version without the tag was not trained privately: ε = inf,
recorded as None so the decision's JSON stays standard)."""

from __future__ import annotations

EPSILON_TAG = "visionops.dp_epsilon"
DELTA_TAG = "visionops.dp_delta"


def tags(privacy: dict) -> dict[str, str]:
    return {EPSILON_TAG: f"{privacy['epsilon']:.6g}", DELTA_TAG: f"{privacy['delta']:.6g}"}


def description(privacy: dict) -> str:
    """One line: the guarantee and how it was reached."""
    line = (f"DP-SGD: ({privacy['epsilon']:.4g}, {privacy['delta']:.3g})-differentially private for the "
            f"{privacy['train_images']:,} train images ({privacy['accountant']} accountant; noise multiplier "
            f"{privacy['noise_multiplier']:.4g}, max_grad_norm {privacy['max_grad_norm']:g}, {privacy['steps']} "
            f"Poisson-sampled steps at rate {privacy['sample_rate']:.4g}")
    if privacy["group_norm"]:
        line += f"; {len(privacy['group_norm'])} batch norm layers trained as group norm"
    if "teacher_epsilon" in privacy:
        line += (f"; distilled: student ε {privacy['student_epsilon']:.4g} + teacher ε {privacy['teacher_epsilon']:.4g} "
                 "(basic composition)")
    return line + ")"


def recorded_epsilon(version_tags: dict) -> float | None:
    """The version's ε; None (ε = inf) when it was not trained with DP-SGD."""
    value = version_tags.get(EPSILON_TAG)
    return None if value is None else float(value)
