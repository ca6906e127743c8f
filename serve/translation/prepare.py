"""`prepare`: one `Intent` -> a checked engine request, its plan and its reply parser. The chain
every API style runs, written once: the model is live and the one asked for, the plan (tools,
tool choice, thinking, response format), the prompt (generic tool prompt, chat template, BOS,
splicing, image places), the request checks (sampling values, window, max tokens), the images'
embeddings and the grammar constraint.

Everything a request can get wrong is an `ApiError` raised here, before anything is queued.
The prompt is rendered and tokenized in the hub's prepare pool, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve.engine import Engine, GenerationRequest
from serve.errors import ApiError
from serve.settings import Settings
from serve.state import Hub
from serve.translation.images import embedded_spans, no_projector, prepare_images
from serve.translation.intent import Intent, Sampling, message_images
from serve.translation.plan import Plan, constrain, plan_of
from serve.translation.prompt import Prompt, chat_prompt, check_model, raw_prompt
from serve.translation.reply import Reply
from serve.translation.tools import normalize_tools, tool_choice_of, with_generic_tools
from tsjax.generation import PromptTooLongError
from tsjax.model import Model
from tsjax.sampling import SamplingParams


@dataclass
class Prepared:
    """A request ready for the engine: what to submit, how to read its output (one `Reply`
    per answer), and the prompt it was made from (ids, text, and the turns a stateful API
    records)."""

    request: GenerationRequest
    replies: list[Reply]
    plan: Plan
    prompt: Prompt
    model: Model

    @property
    def reply(self) -> Reply:
        """The first answer's reply (the only one unless `n` > 1)."""
        return self.replies[0]


def sampling_params(settings: Settings, given: Sampling) -> SamplingParams:
    """Server defaults, overridden by the request's fields that are present (not None)."""
    values = {name: getattr(settings, name) for name in SamplingParams.__dataclass_fields__}
    values.update({k: v for k in given.__struct_fields__ if (v := getattr(given, k)) is not None})
    return SamplingParams(**values)


def make_request(
    engine: Engine,
    prompt_ids: list[int],
    sampling: SamplingParams,
    max_tokens: int,
    stop: tuple[str, ...],
    *,
    reuse_prefix: bool,
    images: int | list[int] = 0,
    n: int = 1,
    logprobs: bool = False,
    prompt_logprobs: bool = False,
) -> GenerationRequest:
    """A checked engine request: bad sampling values, a prompt over the window or more
    answers than rows are 400s here, before anything is queued or streamed. max_tokens <= 0
    means "until the window is full" (Ollama's -1), except with `prompt_logprobs`, where 0
    scores the prompt without generating. `images`: how many, or each one's positions (what a
    refusal for length says)."""
    room = engine.model.max_len - len(prompt_ids)
    budget = room if max_tokens < 0 or (max_tokens == 0 and not prompt_logprobs) else max_tokens
    if not 1 <= n <= engine.rows:
        raise ApiError(400, f"n must be between 1 and {engine.rows} (the answers this server "
                       f"decodes at once), got {n}", param="n")  # fmt: skip
    req = GenerationRequest(
        prompt_ids, sampling, max_tokens=max(budget, 0 if prompt_logprobs else 1), stop=stop,
        reuse_prefix=reuse_prefix, n=n, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )  # fmt: skip
    try:
        engine.check(req)
    except PromptTooLongError as e:
        images = _images_note(engine.model, images)
        raise ApiError(
            400, f"{e}{images}: shorten the conversation or start a new one", param="messages"
        ) from e
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    return req


def _images_note(model: Model, images: int | list[int]) -> str:
    """What a prompt too long for the window says about its images."""
    proj = model.projector
    if not images or proj is None:
        return ""
    if not proj.config.dynamic:
        return f" (each image takes {proj.tokens_per_image + 2} tokens: send fewer images)"
    n = images if isinstance(images, int) else len(images)
    taken = "" if isinstance(images, int) else f" take {sum(images)} positions"
    return f" (its {n} image(s){taken}: send fewer or smaller images)"


def _prompt(
    model: Model,
    intent: Intent,
    plan: Plan,
    resume_points: bool = False,
    lengths: list[int] | None = None,
) -> Prompt:
    """The prompt's ids and text (blocking: `prepare` runs it in the prepare pool). A prompt
    too long for the window by its length alone is refused before it is tokenized.
    `lengths`: each image's positions (`PreparedImage.tokens`)."""
    if intent.messages is None:
        text = intent.prompt or ""
        ids, starts = raw_prompt(model, text, len(intent.images), lengths)
        return Prompt(ids, text, [], starts)
    if not intent.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    shown = with_generic_tools(intent.messages, plan.template_tools, model.template.source)
    extra = dict(intent.template_kwargs)
    if intent.effort is not None:  # chat_template_kwargs may name it themselves
        extra.setdefault("reasoning_effort", intent.effort)
    return chat_prompt(model, shown, tools=plan.template_tools, think=plan.think,
                       extra=extra, history=intent.history,
                       resume_points=resume_points, lengths=lengths)  # fmt: skip


async def render(
    hub: Hub, intent: Intent, resume_points: bool = False, prepared: list | None = None
) -> tuple[Plan, Prompt]:
    """The first half of `prepare`: the model check, the plan and the prompt, with nothing
    built or queued (what counting a request's input tokens needs). `resume_points`: find
    where the prompt's state is worth saving (`Prompt.resume_points`). `prepared`: the
    request's images already prepared (`prepare_images`); None prepares them here when the
    projector's image sizes vary (their token counts are part of the prompt)."""
    model, _ = hub.live()
    if intent.model is not None:
        check_model(intent.model, model)
    images = intent.images if intent.messages is None else message_images(intent.messages)
    audio = any(m.kind == "audio" for m in images)
    if images and model.projector is None:
        raise ApiError(400, no_projector(model, audio), param="images" if intent.messages is None
                       else "messages")  # fmt: skip
    tools = normalize_tools(intent.tools)
    choice = tool_choice_of(intent.tool_choice, tools)
    plan = plan_of(tools=tools, choice=choice, think=intent.think, output=intent.output)
    lengths = None
    if images and model.projector is not None and (model.projector.config.dynamic or audio):
        if prepared is None:
            prepared = await prepare_images(model, images)
        lengths = [p.tokens for p in prepared]
    # Rendering and tokenizing a long prompt takes seconds: off the event loop, which keeps
    # serving every other request meanwhile.
    return plan, await hub.offload(_prompt, model, intent, plan, resume_points, lengths)


async def prepare(hub: Hub, intent: Intent) -> Prepared:
    """The engine request for `intent`, checked, with its constraint and reply parser."""
    model, engine = hub.live()
    images = intent.images if intent.messages is None else message_images(intent.messages)
    # a bad image is a 400 before anything else (render refuses images without a projector)
    prepared = await prepare_images(model, images) if model.projector is not None else []
    # a cache that cannot rewind resumes only where it saved its state: find where to
    plan, prompt = await render(hub, intent, resume_points=not engine.rewinds, prepared=prepared)
    s = hub.settings
    sampling = sampling_params(s, intent.sampling)
    max_tokens = s.max_tokens if intent.max_tokens is None else intent.max_tokens
    stop = tuple(s.stop) if intent.stop is None else intent.stop
    req = make_request(
        engine, prompt.ids, sampling, max_tokens, stop, reuse_prefix=intent.reuse_prefix,
        images=[p.tokens for p in prepared] or len(images), n=intent.n,
        logprobs=intent.logprobs,
        prompt_logprobs=intent.prompt_logprobs,
    )  # fmt: skip
    # encoded last: a request refused for anything else costs no encoder time
    req.spans = await embedded_spans(hub, prepared, prompt.image_starts)
    req.checkpoints = prompt.resume_points
    plan = await constrain(hub, plan, prompt.text)
    req.constraint = plan.constraint
    replies = [Reply(hub, plan, prompt.text) for _ in range(intent.n)]
    return Prepared(req, replies, plan, prompt, model)
