"""The model zoo: MONAI bundles with a triage spec, validated into a registry.

Importing this package does not import torch; :mod:`pipeline.inference` does, lazily.
"""

from pipeline.zoo.bundle import Bundle, BundleMetadata, check_bundle
from pipeline.zoo.registry import RegisteredModel, Registry, UnavailableModel, load_registry
from pipeline.zoo.spec import FindingSpec, SeriesRules, TriageSpec, load_spec, parse_spec

__all__ = [
    "Bundle", "BundleMetadata", "FindingSpec", "RegisteredModel", "Registry", "SeriesRules", "TriageSpec",
    "UnavailableModel", "check_bundle", "load_registry", "load_spec", "parse_spec",
]
