"""The paper's ablations as commands: ``structvit study ablation`` and ``structvit study paper``.

The library parts take plain arguments and can be used from code:

- :mod:`.plan`: the study file read and checked, expanded into runs (:class:`Run`);
- :mod:`.variants`: a variant's model (:func:`build_model`, :class:`SharedOverChannels` for
  ``value_patterns: head``) and its cost;
- :mod:`.runner`: training one run or the whole plan, in worker processes if asked;
- :mod:`.stats`: mean and std over seeds, Welch's t-test, the paper tables' cells;
- :mod:`.tables`, :mod:`.plots`: the tables and figures of a study folder;
- :mod:`.page`: the documentation's results page, made from the runs' CSV;
- :mod:`.cli`: the command line (``python -m structvit.study``).
"""
from .cli import STUDIES, main
from .page import publish, regenerate, write_results_page
from .plan import (DEFAULT_CONFIG, PAPER_CONFIG, RESULT, VALUE_PATTERNS, Run, StudyError, expand_plan, load_study,
                   quick_study, variant_D)
from .plots import learning_curve, plot, plot_paper
from .runner import finished, run_study, train_run
from .stats import aggregate, mean_std, paper_summary, welch
from .tables import (collect, read_results_csv, report, write_paper_tables, write_results_csv, write_tables)
from .variants import (SharedOverChannels, build_model, model_cost, prepare_model, resolved_model_kwargs,
                       tie_value_patterns)

__all__ = ["Run", "StudyError", "DEFAULT_CONFIG", "PAPER_CONFIG", "RESULT", "VALUE_PATTERNS", "STUDIES",
           "load_study", "quick_study", "expand_plan", "variant_D", "SharedOverChannels", "tie_value_patterns",
           "prepare_model", "resolved_model_kwargs", "build_model", "model_cost", "train_run", "finished",
           "run_study", "collect", "aggregate", "mean_std", "write_tables", "write_results_csv", "read_results_csv",
           "learning_curve", "plot", "welch", "paper_summary", "write_paper_tables", "plot_paper", "report",
           "write_results_page", "publish", "regenerate", "main"]
