"""Health monitoring: sensors, checks, baselines and anomaly detection, predictions, alerts,
quarantine and recovery.

Theory of operation: the protocol logic is pure cores -- incremental statistics
(:mod:`.stats`), anomaly detectors (:mod:`.anomaly`), trend predictions (:mod:`.predict`),
alert rules with hysteresis and burn rates plus the escalation matrix (:mod:`.alerts`), the
quarantine book (:mod:`.quarantine`) and recovery planning (:mod:`.recovery`). The I/O is
thin: sensors (:mod:`.sensors`), checks and their runner (:mod:`.checks`), the webhook sender
(:mod:`.webhook`) and the node's :class:`~agentcluster.health.service.HealthService`, which
the HealthMonitor agent (:mod:`agentcluster.clustering.health_monitor`) drives.
"""

from agentcluster.health.alerts import (
    Alert,
    AlertEngine,
    AlertEvent,
    AlertRule,
    BurnRateRule,
    BurnWindow,
    EscalationMatrix,
    EscalationStep,
)
from agentcluster.health.anomaly import (
    Anomaly,
    MetricMonitor,
    PercentileDetector,
    TrendDetector,
    ZScoreDetector,
    cpu_detector,
    latency_detector,
    memory_detector,
    network_detector,
    severity_of,
)
from agentcluster.health.checks import (
    CHECK_PRESETS,
    Check,
    CheckResult,
    CheckRunner,
    basic_check,
    check_preset,
    standard_checks,
    stream_ping,
)
from agentcluster.health.predict import (
    Prediction,
    PredictRule,
    combined_confidence,
    linear_fit,
    predict,
    time_to_threshold,
)
from agentcluster.health.quarantine import QuarantineBook, QuarantineConfig, QuarantineEntry
from agentcluster.health.recovery import (
    DrainNode,
    ManualInterventionRequired,
    Problem,
    RecoveryContext,
    RecoveryProcedure,
    RecoveryRunner,
    Rejoin,
    RestartAgent,
)
from agentcluster.health.sensors import (
    AppHealth,
    AppHealthTracker,
    LoopLagSensor,
    Vitals,
    VitalsSampler,
)
from agentcluster.health.stats import Ewma, P2Quantile, RollingWindow, Welford
from agentcluster.health.webhook import WebhookSender

__all__ = [
    "CHECK_PRESETS",
    "Alert",
    "AlertEngine",
    "AlertEvent",
    "AlertRule",
    "Anomaly",
    "AppHealth",
    "AppHealthTracker",
    "BurnRateRule",
    "BurnWindow",
    "Check",
    "CheckResult",
    "CheckRunner",
    "DrainNode",
    "EscalationMatrix",
    "EscalationStep",
    "Ewma",
    "LoopLagSensor",
    "ManualInterventionRequired",
    "MetricMonitor",
    "P2Quantile",
    "PercentileDetector",
    "PredictRule",
    "Prediction",
    "Problem",
    "QuarantineBook",
    "QuarantineConfig",
    "QuarantineEntry",
    "RecoveryContext",
    "RecoveryProcedure",
    "RecoveryRunner",
    "Rejoin",
    "RestartAgent",
    "RollingWindow",
    "TrendDetector",
    "Vitals",
    "VitalsSampler",
    "WebhookSender",
    "Welford",
    "ZScoreDetector",
    "basic_check",
    "check_preset",
    "combined_confidence",
    "cpu_detector",
    "latency_detector",
    "linear_fit",
    "memory_detector",
    "network_detector",
    "predict",
    "severity_of",
    "standard_checks",
    "stream_ping",
    "time_to_threshold",
]
