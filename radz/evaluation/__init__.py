"""Zero-shot evaluation: metrics, threshold protocols and reports; the harness behind evaluate_radz.py."""

from .metrics import ORACLE_CAPTION
from .metrics import PROTOCOLS
from .metrics import ThresholdChoice
from .metrics import bootstrap_auc_ci
from .metrics import choose_thresholds
from .metrics import compute_metrics
from .metrics import format_report_table
from .metrics import load_metric
from .metrics import thresholds_for_protocol
from .harness import EvaluationConfig
from .harness import read_metrics
from .harness import run_evaluation
from .harness import summary_auc
from .methods import METHODS
from .methods import EvaluationError
from .methods import RadZScorer
from .methods import register_method
from .scorer import Scorer
from .scorer import model_fingerprint
from .scorer import settings_key

__all__ = [
    "EvaluationConfig",
    "EvaluationError",
    "METHODS",
    "RadZScorer",
    "Scorer",
    "model_fingerprint",
    "register_method",
    "settings_key",
    "read_metrics",
    "run_evaluation",
    "summary_auc",
    "ORACLE_CAPTION",
    "PROTOCOLS",
    "ThresholdChoice",
    "bootstrap_auc_ci",
    "choose_thresholds",
    "compute_metrics",
    "format_report_table",
    "load_metric",
    "thresholds_for_protocol",
]
