"""Experiments on the library, not part of it: the study behind `multitoken ablate` (does MTP make the
main model better?). config.py says what a study is (head configurations, the named suites that are
issue 24's phases, the typed `StudyConfig`); study.py plans and trains its runs, resumably;
results.py keeps finished runs across machines by identity and data fingerprint; measure.py and
quality.py measure a run (bits per byte, next-line exact match, second-token acceptance teacher-forced
and in generation); report.py writes the table and the curves."""
