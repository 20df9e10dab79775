"""The gRPC edge: `tokenpool.v1.Generation`, `grpc.health.v1` and server reflection.

    server = create_grpc_server(frontend, config, "127.0.0.1:50051")  # inside the event loop
    await server.start()
    ...
    print(server.bound_port)
    await stop_grpc_server(server, grace_s=5)  # NOT_SERVING first, then drain

It is an asyncio server, so it shares uvicorn's loop. The Generation methods take the raw
request bytes and parse them here, not in grpc's deserializer: a deserializer's failure
becomes INTERNAL, but malformed protobuf, a string field that is not UTF-8 (protobuf's parser
refuses those) and an oversized message are the client's fault, INVALID_ARGUMENT (DESIGN §7).

The transport still refuses messages above TRANSPORT_LIMIT_FACTOR x max_body_bytes, with
gRPC's own RESOURCE_EXHAUSTED, so a huge message is never read into memory at all.

The client's deadline: when it passes, gRPC itself ends the call with DEADLINE_EXCEEDED and
cancels this handler's task, which closes the stream and so cancels the request in the
controller, exactly as a client's cancel does (CANCELLED). The Frontend's own limit,
`request_timeout_s`, ends a request that runs longer with DEADLINE_EXCEEDED too.

Health and reflection need no API key (probes and tooling carry none, like HTTP's /health);
the Generation service does when `config.api_key` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenpool.controller.serving_types import ServeRequest, TokenEvent
from tokenpool.errors import InvalidRequestError, InvalidSamplingError, TokenpoolError
from tokenpool.proxy.config import ProxyConfig
from tokenpool.proxy.grpc_codegen import pb2
from tokenpool.proxy.grpc_errors import failure_of_error, failure_of_event, invalid_argument
from tokenpool.sampling import SamplingDefaults, SamplingRequest

SERVICE = "tokenpool.v1.Generation"
TRANSPORT_LIMIT_FACTOR = 4  # see the module docstring
# proto3 `optional` fields: HasField tells an unset one from a zero.
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")
_DEFAULTABLE = ("max_tokens", "temperature", "top_p", "top_k")  # a model may set these
DEFAULT_MAX_TOKENS = 16  # neither the request nor its model sets max_tokens: OpenAI's

log = logging.getLogger(__name__)


# -- the server ---------------------------------------------------------------------------


class _Health(health.aio.HealthServicer):
    """grpc's servicer, starting with our service SERVING too (the base knows only "")."""

    def __init__(self, services: tuple[str, ...]):
        super().__init__()
        for service in services:
            self._server_status[service] = health_pb2.HealthCheckResponse.SERVING


def create_grpc_server(frontend, config: ProxyConfig, address: str) -> grpc.aio.Server:
    """A bound, not yet started server. Call it with the event loop running.

    The server carries two attributes of ours: `bound_port` (the port chosen for an address
    ending in :0) and `health_servicer` (see `set_serving` and `stop_grpc_server`).
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_body_bytes * TRANSPORT_LIMIT_FACTOR),
        ("grpc.so_reuseport", 0),  # a port already in use is an error, not shared silently
    ])
    server.add_generic_rpc_handlers((GenerationServicer(frontend, config).handlers(),))
    health_servicer = _Health(("", SERVICE))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    server.bound_port = _bind(server, address)
    server.health_servicer = health_servicer
    return server


def _bind(server: grpc.aio.Server, address: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # recent grpc's way of saying the bind failed
        raise OSError(f"cannot bind the gRPC server to {address} (in use?)") from exc
    if port == 0:  # older grpc's way
        raise OSError(f"cannot bind the gRPC server to {address} (in use?)")
    return port


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for service in ("", SERVICE):
        await server.health_servicer.set(service, status)


async def stop_grpc_server(server: grpc.aio.Server, grace_s: float | None = 5.0) -> None:
    """Health says NOT_SERVING from now on; running streams get `grace_s` to finish."""
    await server.health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)


# -- the Generation service ----------------------------------------------------------------


class GenerationServicer:
    def __init__(self, frontend, config: ProxyConfig):
        self.frontend = frontend
        self.config = config

    def handlers(self) -> grpc.GenericRpcHandler:
        # No request_deserializer: the methods get the raw bytes (see the module docstring).
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, response_serializer=pb2.GenerateResponse.SerializeToString),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models, response_serializer=pb2.ListModelsResponse.SerializeToString),
        })

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        await _guarded("Generate", self._generate(raw, context), context)

    async def list_models(self, raw: bytes, context: grpc.aio.ServicerContext
                          ) -> pb2.ListModelsResponse:
        return await _guarded("ListModels", self._list_models(raw, context), context)

    async def _list_models(self, raw: bytes, context: grpc.aio.ServicerContext
                           ) -> pb2.ListModelsResponse:
        await self._authorize(context)
        await self._parse(raw, pb2.ListModelsRequest, context)
        return pb2.ListModelsResponse(models=[
            pb2.ModelInfo(id=card.id, max_model_len=card.max_model_len,
                          ttft_slo_s=card.slo.ttft_s, tbt_slo_s=card.slo.tbt_s,
                          created=card.created)
            for card in self.frontend.catalog.values()])

    async def _generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context)
        message = await self._parse(raw, pb2.GenerateRequest, context)
        request = await self._serve_request(message, context)
        log.debug("Generate %s: model %s, %d prompt tokens", request.request_id,
                  request.model, len(request.prompt_ids))
        await self._stream(request, context)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.config.api_key and not _key_matches(context, self.config.api_key):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "a valid API key is required (metadata `authorization: "
                                "Bearer KEY` or `x-api-key: KEY`)")

    async def _parse(self, raw: bytes, message_type, context: grpc.aio.ServicerContext):
        if len(raw) > self.config.max_body_bytes:
            await invalid_argument(f"the request is {len(raw)} bytes, more than the limit of "
                                   f"{self.config.max_body_bytes}").abort(context)
        try:
            return message_type.FromString(raw)
        except DecodeError:
            await invalid_argument(
                f"the request is not a valid {message_type.DESCRIPTOR.full_name}: malformed "
                "protobuf, or a string field that is not UTF-8").abort(context)

    async def _serve_request(self, message, context: grpc.aio.ServicerContext
                             ) -> ServeRequest:
        try:
            # Tokenizing a long prompt takes a while: off the loop that streams other tokens.
            return await asyncio.to_thread(serve_request_of, self.frontend, message)
        except TokenpoolError as exc:
            await _abort_for(exc, context)

    async def _stream(self, request: ServeRequest, context: grpc.aio.ServicerContext) -> None:
        # aclosing: however this ends (abort, the client's cancel, the deadline), the stream
        # is closed at once, and closing it early cancels the request in the controller.
        try:
            async with contextlib.aclosing(self.frontend.stream(request)) as events:
                async for event in events:
                    failure = failure_of_event(event)
                    if failure is not None:
                        log.info("Generate %s ended: %s", request.request_id, failure.details)
                        await failure.abort(context)
                    await context.write(response_of(event))
        except TokenpoolError as exc:  # refused at submit: overloaded, or not serving
            await _abort_for(exc, context)


async def _guarded(method: str, work, context: grpc.aio.ServicerContext):
    """Awaits `work`; an exception we did not expect is a bug of ours: INTERNAL, and its
    traceback goes to the log (the request itself, prompt included, does not)."""
    try:
        return await work
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("%s failed unexpectedly", method)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    failure = failure_of_error(exc)
    if failure is None:
        raise exc
    await failure.abort(context)


def _key_matches(context: grpc.aio.ServicerContext, api_key: str) -> bool:
    """Either header may carry the key; compare_digest keeps the comparison's time
    independent of how much of a guess is right."""
    metadata = {key.lower(): value for key, value in context.invocation_metadata() or ()}
    given = [metadata.get("x-api-key")]
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    if scheme.lower() == "bearer":
        given.append(token.strip())
    return any(isinstance(key, str) and hmac.compare_digest(key.encode(), api_key.encode())
               for key in given)


# -- wire messages <-> tokenpool's types ---------------------------------------------------


def serve_request_of(frontend, message) -> ServeRequest:
    """A validated request, or one of tokenpool's typed errors."""
    if not message.model:
        raise InvalidRequestError("model is required", "model")
    frontend.card(message.model)  # an unknown model is NOT_FOUND, whatever else is wrong
    params = sampling_of(message)
    which = message.WhichOneof("input")
    if which == "prompt":
        return frontend.request(message.model, params, prompt=message.prompt)
    if which == "prompt_ids":
        return frontend.request(message.model, params, prompt_ids=list(message.prompt_ids.ids))
    if which == "messages":
        chat = [{"role": m.role, "content": m.content} for m in message.messages.messages]
        return frontend.request(message.model, params, messages=chat)
    return frontend.request(message.model, params)  # none given: the Frontend says so


def sampling_of(message) -> SamplingRequest:
    """What the message asked for; unset fields take the model's defaults, else OpenAI's
    (and max_tokens 16). Set ones are checked, zero included."""
    given = {name: getattr(message, name) for name in _OPTIONAL_SAMPLING
             if message.HasField(name)}
    for name in ("temperature", "top_p"):
        if name in given and not math.isfinite(given[name]):
            raise InvalidSamplingError(f"{name} must be a finite number, got {given[name]}",
                                       name)
    asked = {name: given.pop(name) for name in _DEFAULTABLE if name in given}
    options = dict(given, stop=tuple(message.stop),  # given: seed and logprobs, if set
                   stop_token_ids=tuple(message.stop_token_ids), ignore_eos=message.ignore_eos)
    return SamplingRequest(SamplingDefaults(**asked), DEFAULT_MAX_TOKENS, options)


def response_of(event: TokenEvent) -> pb2.GenerateResponse:
    return pb2.GenerateResponse(
        request_id=event.request_id, token_ids=event.token_ids, text=event.text,
        finished=event.finished, finish_reason=event.finish_reason or "",
        usage=pb2.Usage(prompt_tokens=event.num_prompt_tokens,
                        completion_tokens=event.num_output_tokens,
                        cached_tokens=event.num_cached_tokens),
        logprobs=[_logprob_of(lp) for lp in event.logprobs if lp is not None],
        emitted_at=event.emitted_at)


def _logprob_of(lp) -> pb2.TokenLogprob:
    """`lp`: a gpu_pool.sampler.TokenLogprobs."""
    return pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
