"""The synthetic tasks the research benchmarks run on: configuration overrides over the tiny preset.

* ``chain``: the embedded default (``make demo``): chained additions, errors independent per step.
* ``planted``: problems with one planted critical step (attnrl/data/planted.py), levels of 2-4 definitions;
  its responses (up to ~55 tokens) fit the limits, and the tiny model needs 3000 warmup steps (not the chain's
  800) to read a variable back.
"""

TASKS: dict[str, list[str]] = {
    "chain": [],
    "planted": ["data.synthetic.family=planted", "data.synthetic.levels=[2, 3, 4]",
                "rollout.sampling.max_new_tokens=80", "eval.max_new_tokens=80", "warmup.steps=3000"],
}
