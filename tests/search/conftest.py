# The evaluation tests' tiny Llama family (with a real tokenizer) serves the search tests too.
from evaluate.conftest import _one_thread, lm_family  # noqa: F401
