"""The router (`auto`) and A/B experiments over strategies."""

from .classifier import ClassifierError, RouterClassifier  # noqa: F401
from .experiments import Arm, ExperimentError, Experiments  # noqa: F401
from .features import Features  # noqa: F401
from .router import PREFERENCE, Decision, Router  # noqa: F401
