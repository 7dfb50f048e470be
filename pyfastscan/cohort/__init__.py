"""Cohort scanning (issue 16): many slides, each into its own folder, locally or on Ray.

    from pyfastscan.cohort import scan_cohort
    result = scan_cohort(slides, model, "out", engine="ray")   # out/cohort.csv, out/cohort.jsonl
"""
from .job import scan_cohort
from .run import COHORT_CSV, COHORT_EVENTS, CohortResult, SlideRecord, run_key

__all__ = ["scan_cohort", "CohortResult", "SlideRecord", "run_key", "COHORT_CSV", "COHORT_EVENTS"]
