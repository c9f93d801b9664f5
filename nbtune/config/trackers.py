"""`report_to`: the experiment trackers a run logs to, checked against transformers' integrations."""

from __future__ import annotations

from nbtune.errors import ConfigError, did_you_mean


def check_trackers(value: str | list[str]) -> str | list[str]:
    """`report_to` as the Trainer takes it: 'none', 'all', one tracker's name or a list of them, each a name
    transformers has an integration for. Whether its package is installed is checked when training starts
    (engine/training/trainer.py): a saved run that named a tracker must still open where that package is missing."""
    names = list(dict.fromkeys(n.lower() for n in ([value] if isinstance(value, str) else value)))
    if names in ([], ["none"]):
        return "none"
    # transformers' integrations table (importing it costs seconds: only for a config that names a tracker)
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = [*INTEGRATION_TO_CALLBACK, "all", "none"]
    for name in names:
        if name not in known:
            raise ConfigError(f"`report_to` names {name!r}, which is no tracker transformers reports to."
                              f"{did_you_mean(name, known)} Trackers: {', '.join(known)}.", field="report_to")
    if len(names) > 1 and {"all", "none"} & set(names):
        raise ConfigError("`report_to`: 'all' and 'none' stand alone, not in a list of trackers.", field="report_to")
    return names[0] if len(names) == 1 else names

