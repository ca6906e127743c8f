"""Translation every API style shares, written once. Adapters (serve/protocols) parse their
wire body into an `Intent`, call `prepare`, and render the engine's events through the
prepared `Reply`; they hold no more than their wire format.

* `intent`: the neutral request (`Intent`, `Sampling`, `OutputSpec`).
* `options`: the options API styles spell differently (think, response formats, stop).
* `tools`: tool lists and tool choice; the generic tool prompt for templates without tools.
* `plan`: what the output must be (`Plan`) and the grammar constraint that enforces it.
* `prompt`: model names, the chat template with its BOS rule, raw prompts, splicing.
* `reply`: the output parser's view of one answer, and its check against the plan.
* `prepare`: the chain above, `Intent` -> `Prepared` (engine request, reply, prompt);
  `render`, its first half (plan and prompt: counting input tokens).
"""

from serve.translation.intent import Intent, OutputSpec, Sampling
from serve.translation.prepare import Prepared, prepare, render
from serve.translation.reply import Answer, Reply, complete, complete_all, run_answers, run_to_end

__all__ = [
    "Answer",
    "Intent",
    "OutputSpec",
    "Prepared",
    "Reply",
    "Sampling",
    "complete",
    "complete_all",
    "prepare",
    "render",
    "run_answers",
    "run_to_end",
]
