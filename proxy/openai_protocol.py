"""The OpenAI wire format: request bodies (validated by pydantic) and response objects.

Requests accept what the official client sends. Fields tokenpool cannot honour are refused
with a 400 naming them when set to anything but their neutral value (silently ignoring
`logit_bias` or `n=3` would return something the client did not ask for); fields it does not
know are ignored, as vLLM does, so newer clients keep working. Value ranges (temperature,
top_p, ...) are checked once, by `SamplingParams`, the same for HTTP and gRPC.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

from tokenpool.errors import InvalidRequestError
from tokenpool.sampling import SamplingDefaults, SamplingRequest


def _utf8(text: str) -> str:
    # JSON can spell lone surrogates ("\ud800"); they are not UTF-8 text (DESIGN §7).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text is not valid UTF-8 (it holds a lone surrogate)") from exc
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    # vLLM's extension: every chunk carries the usage so far, so a client can tell how many
    # tokens each chunk holds (a chunk may hold several when text was held back).
    continuous_usage_stats: bool = False


class _GenerationBody(_Body):
    """What completions and chat completions share."""

    model: str
    # None: the model's default (fleet `defaults:`, generation_config.json), else OpenAI's.
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions, spelled as vLLM spells them.
    top_k: int | None = None  # None: the model's default, else off
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequestError(f"n={self.n} is not supported: only n=1", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported", name)
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", "logit_bias")

    def sampling(self) -> SamplingRequest:
        """What the request asked for; its model's defaults fill what it left out
        (Frontend.request). Raises InvalidSamplingError naming a bad value."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        asked = SamplingDefaults(temperature=self.temperature, top_p=self.top_p,
                                 top_k=self.top_k, max_tokens=self.requested_max_tokens)
        return SamplingRequest(asked, self.default_max_tokens, dict(
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=self.num_logprobs))


class CompletionRequest(_GenerationBody):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = None  # None: the model's default, else OpenAI's 16
    default_max_tokens: ClassVar[int | None] = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise InvalidRequestError("echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of is not supported: only 1", "best_of")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", "suffix")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_kwargs(self) -> dict:
        """Frontend.request's keyword for the prompt: `prompt=` text or `prompt_ids=`."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError("one prompt per request: batched prompts are not "
                                          "supported", "prompt")
            prompt = prompt[0]
        return {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else \
            "".join(part.text for part in self.content or ())
        # The chat templates of the models served know `system`, not OpenAI's newer name.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: the model's default, else the rest of the context
    default_max_tokens: ClassVar[int | None] = None  # the rest of the context, as in vLLM
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_kwargs(self) -> dict:
        return {"messages": [m.as_template_input() for m in self.messages]}


# -- responses ----------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Always sent, zero included, as OpenAI does: a client reads it without a None check.
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
           ) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with `stream`) one chunk of it: OpenAI uses one shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    tokenpool_emitted_at: float | None = None  # opt-in debug: the worker's clock (bench)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict:
        # OpenAI sends `{"content": "..."}`, not `{"role": null, ...}`, after the first chunk.
        return {k: v for k, v in (("role", self.role), ("content", self.content))
                if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    tokenpool_emitted_at: float | None = None  # opt-in debug: the worker's clock (bench)


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenpool"
    max_model_len: int  # an extension, as in vLLM


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
