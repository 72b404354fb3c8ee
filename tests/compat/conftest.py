import importlib.util

# test_lm_eval.py needs lm-eval, which only `make test-hf` installs (in .venv-hf; it is not in the lock). Where it
# is missing, as in `make test`'s venv, the module is not collected: those tests run under `make test-hf` only.
collect_ignore = [] if importlib.util.find_spec("lm_eval") else ["test_lm_eval.py"]
