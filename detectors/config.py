"""Detection settings: explanation margins, case building, risk weights, exceptions.

Everything a privacy officer may want to change lives here or in a rule's YAML, never in
Python. ``DetectionConfig.load(path)`` reads a YAML file whose keys mirror the fields below;
unknown keys are an error, so a typo does not silently leave a default in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from emrwatch.timeutil import recorded_timezone

HOUR = 3600.0
DAY = 86400.0

#: resources that carry no clinical content (registration, billing, scheduling).
NON_CLINICAL_RESOURCES = (
    "Patient",
    "Encounter",
    "Account",
    "Claim",
    "ClaimResponse",
    "Coverage",
    "Invoice",
    "ChargeItem",
    "ExplanationOfBenefit",
    "Appointment",
    "Schedule",
    "Slot",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Consent",
    "AuditEvent",
)


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


class TimezoneError(ConfigError):
    """The hospital's timezone cannot be told from its data directories."""


def _read(path: str | Path | None) -> dict[str, Any]:
    """A detection config file's settings (top level or under ``detection:``); {} for none."""
    if path is None:
        return {}
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data.get("detection", data)  # type: ignore[no-any-return]


@dataclass
class Exception_:
    """An analyst-approved exception: findings it matches are not raised.

    Every non-empty field must match. ``rule`` may be '*' for all rules."""

    id: str
    description: str = ""
    rule: str = "*"
    user_id: str = ""
    role: str = ""
    department: str = ""
    patient_id: str = ""
    workstation: str = ""
    until: str = ""  # ISO date; after it the exception lapses

    def matches(
        self,
        rule_id: str,
        user_id: str,
        role: str,
        department: str,
        patient_id: str,
        workstation: str,
        day: str,
    ) -> bool:
        return (
            (self.rule in ("*", rule_id))
            and (not self.user_id or self.user_id == user_id)
            and (not self.role or self.role == role)
            and (not self.department or self.department == department)
            and (not self.patient_id or self.patient_id == patient_id)
            and (not self.workstation or self.workstation == workstation)
            and (not self.until or day <= self.until)
        )


@dataclass
class DetectionConfig:
    timezone: str = "Asia/Shanghai"
    # explanations
    care_margin_before_s: float = 24 * HOUR  # pre-admission work
    care_margin_after_s: float = 7 * DAY  # follow-up after discharge
    documented_window_s: float = 14 * DAY  # a note/order explains later reads this long
    documented_grace_s: float = 2 * HOUR  # a note written soon after explains earlier reads
    service_margin_s: float = 24 * HOUR  # service departments after an encounter ends
    admin_after_discharge_s: float = 45 * DAY  # records/billing on discharged patients
    emergency_margin_s: float = 2 * HOUR  # ED registration lag
    #: on duty this long before a shift starts and after it ends (handover, late charting):
    #: only accesses further out are "outside the user's shift"
    shift_grace_s: float = 30 * 60
    grant_only_roles: tuple[str, ...] = ("vendor", "researcher")
    clerk_roles: tuple[str, ...] = ("clerk",)
    non_clinical_resources: tuple[str, ...] = NON_CLINICAL_RESOURCES
    # cases
    case_gap_s: float = 8 * HOUR  # a case stays open while findings keep coming
    case_max_s: float = 3 * DAY  # and is cut after this long
    alert_threshold: float = 1.0  # accumulated risk that makes a case an alert
    level_weights: dict[str, float] = field(
        default_factory=lambda: {"low": 0.15, "medium": 0.4, "high": 0.7, "critical": 1.0}
    )
    repeat_weight: float = 0.5  # extra accesses to an already-counted patient
    repeat_cap: int = 2  # how many extra accesses count per rule and case
    # volume baselines
    volume_history_days: int = 14
    # learned models (models/): "" runs the registry shipped with the package, "none" none
    model_registry: str = ""
    #: a visit at least this unusual (−log10 of the share of ordinary visits scoring as high)
    #: is learned evidence; each level above it adds ``model_weight`` risk per patient
    model_min_level: float = 3.0
    model_weight: float = 0.75
    #: while a case holds learned evidence, the user's other visits at least this unusual
    #: join its evidence (not its risk): the rest of a browsing burst; 0: off
    model_follow_level: float = 2.75
    #: only explained visits become learned evidence by themselves (rules judge the rest)
    model_explained_only: bool = True
    #: a case holding only learned evidence stays open this long between findings (slow
    #: misuse spreads over days)
    model_case_gap_s: float = 72 * HOUR
    #: a visit idle for the visit gap (10 min) is scored once the partition's event time is
    #: this much further on, without waiting for the user's next access; an access arriving
    #: later than this behind the newest one starts a new visit
    model_visit_lateness_s: float = 10 * 60
    #: ... widened, up to this, while the input's accesses arrive further behind the newest
    #: one (a log delivered in batches): see detectors.lateness. Equal to
    #: ``model_visit_lateness_s``: fixed
    late_allowance_max_s: float = 2 * HOUR
    #: a streamed access stamped more than this after its record was produced comes from a
    #: wrong clock: it is judged at the record's time
    max_clock_ahead_s: float = 300.0
    #: a streamed access stamped more than this before its record was produced, steadily
    #: (a source's clock runs behind: detectors.lateness.SteadyOffset), is judged that
    #: much later; 0 takes such stamps as they are
    max_clock_behind_s: float = 3600.0
    #: in a replay of a file (no record times): an access stamped more than this ahead of
    #: everything before it and of the lines after it is judged at the file's time there
    #: (pipeline.file_clock), and a source's accesses steadily more than this behind it
    #: are judged that much later; 0 takes every stamp as it is
    replay_clock_ahead_s: float = 3600.0
    #: scale soft rule risk by the case model (0.5 + P(misuse)); False: rules as they are
    model_fusion: bool = True
    #: look for a newly promoted model at most this often (seconds of wall time)
    model_reload_s: float = 2.0
    # rules
    rules_dir: str = ""  # empty: the rules shipped in detectors/rules
    disabled_rules: tuple[str, ...] = ()
    rule_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    exceptions: list[Exception_] = field(default_factory=list)

    @classmethod
    def in_zone(cls, config: DetectionConfig | None, timezone: str) -> DetectionConfig:
        """``config`` (the defaults when None) judging in ``timezone``, the hospital's."""
        return replace(config, timezone=timezone) if config else cls(timezone=timezone)

    @classmethod
    def load(cls, path: str | Path | None) -> DetectionConfig:
        return cls.from_dict(_read(path), source=str(path)) if path is not None else cls()

    @classmethod
    def load_for(
        cls,
        path: str | Path | None,
        timezone: str | None = None,
        data_dirs: Iterable[str | Path] = (),
        fallback: str | None = None,
    ) -> tuple[DetectionConfig, str | None]:
        """The config at ``path`` for a hospital's data, its timezone resolved: ``timezone``
        (a command's ``--timezone``) if given, else the file's own, else the zone the
        ``data_dirs`` record in their ``manifest.json`` (they must agree), else
        ``fallback``, else the default. Returns the config and the recorded zone when it
        was taken from there and differs from the default (the caller says so). A zone a
        manifest names that is unknown, or directories that disagree: ``TimezoneError``."""
        data = _read(path)
        cfg = cls.from_dict(data, source=str(path)) if path is not None else cls()
        if timezone:
            cfg.timezone = timezone
            return cfg, None
        if "timezone" in data:
            return cfg, None
        try:
            recorded = {str(d): z for d in data_dirs if (z := recorded_timezone(d))}
        except ValueError as exc:
            raise TimezoneError(str(exc)) from None
        if len(set(recorded.values())) > 1:
            raise TimezoneError(
                "the directories record different timezones ("
                + ", ".join(f"{d}: {z}" for d, z in recorded.items())
                + "): one hospital at a time"
            )
        if recorded:
            (zone,) = set(recorded.values())
            if zone != cfg.timezone:
                cfg.timezone = zone
                return cfg, zone
            return cfg, None
        if fallback:
            cfg.timezone = fallback
        return cfg, None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DetectionConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}")
        kw = dict(data)
        for key in ("grant_only_roles", "clerk_roles", "non_clinical_resources", "disabled_rules"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "exceptions" in kw:
            try:
                kw["exceptions"] = [Exception_(**e) for e in kw["exceptions"] or []]
            except TypeError as exc:
                raise ConfigError(f"{source}: exceptions: {exc}") from None
        cfg = cls(**kw)
        missing = {"low", "medium", "high", "critical"} - set(cfg.level_weights)
        if missing:
            raise ConfigError(f"{source}: level_weights lacks {sorted(missing)}")
        if not 0 <= cfg.shift_grace_s <= 12 * HOUR:
            raise ConfigError(
                f"{source}: shift_grace_s must be between 0 and {12 * HOUR:.0f} seconds, "
                f"not {cfg.shift_grace_s!r}"
            )
        for key in (
            "max_clock_ahead_s",
            "max_clock_behind_s",
            "replay_clock_ahead_s",
            "model_visit_lateness_s",
            "late_allowance_max_s",
            "model_follow_level",
        ):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"{source}: {key} must be 0 or more, not {getattr(cfg, key)!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
