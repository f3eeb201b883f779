"""The Ray Serve application of `lavit serve`: an ingress deployment (the FastAPI app of `app.py`: parsing, limits,
images, prompt length) in front of the model deployment (replicas, each with a `LaVITEngine`, batching concurrent
requests with `@serve.batch` into one `generate`).

One machine: `lavit serve MODEL` (`run_server`). A cluster: `serve deploy` a config whose `import_path` is
`lavit.serving.deployments:build_app` and whose `args` are `ServeSettings` fields (docs/serving.md).
"""

import asyncio
import signal
import time
from dataclasses import asdict, dataclass, field

from ray import serve
from ray.exceptions import RayActorError

from .app import collect, create_app, image_result
from .engine import ChatJob, ImageJob, LaVITEngine, RequestPreparer
from .schemas import OpenAIError, ServeLimits

MODEL_DEPLOYMENT = "LaVITModel"


@dataclass
class ServeSettings:
    """Everything `lavit serve` and a `serve deploy` config (`args`) can set."""

    model: str
    model_name: str | None = None  # the `model` clients send (default: the folder name or Hub id)
    replicas: int = 1
    max_replicas: int | None = None  # > replicas: autoscale between the two on ongoing requests
    target_ongoing_requests: int = 16  # per replica, what the autoscaler aims at
    autoscaling: dict = field(default_factory=dict)  # more Ray Serve `autoscaling_config` fields (upscale_delay_s, ...)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    dtype: str | None = None
    max_batch_size: int = 16  # 1: one request at a time
    max_image_batch_size: int = 4  # image requests drawn in one pipeline call
    batch_wait_timeout_s: float = 0.02
    request_timeout_s: float = 600.0  # a request still running then gets a 408
    allowed_local_media_path: str | None = None
    limits: dict = field(default_factory=dict)  # `ServeLimits` fields

    def served_name(self) -> str:
        return self.model_name or self.model.rstrip("/").split("/")[-1]


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=64, graceful_shutdown_timeout_s=120,
                  health_check_period_s=2)
class LaVITModelDeployment:
    """One model replica. Concurrent `chat` calls are gathered by `@serve.batch` and decoded in one `generate` (rows
    independent: each answer is the one it would get alone)."""

    def __init__(self, model: str, device: str | None, dtype: str | None, max_batch_size: int,
                 batch_wait_timeout_s: float, max_image_batch_size: int = 4):
        self.engine = LaVITEngine(model, device=device, dtype=dtype)
        self.chat_batch.set_max_batch_size(max_batch_size)
        self.chat_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.image_batch.set_max_batch_size(max_image_batch_size)
        self.image_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def chat_batch(self, jobs: list[ChatJob]):
        async for items in self.engine.stream(jobs):
            yield items

    async def chat(self, job: ChatJob):
        """Streams the job's per-step deltas (call with `handle.options(stream=True)`)."""
        try:
            async for deltas in self.chat_batch(job):
                yield deltas
        except (asyncio.CancelledError, GeneratorExit):  # the caller gave up (timeout, closed connection)
            job.cancelled = True  # its rows stop; the rows batched with it go on
            raise

    async def complete(self, job: ChatJob) -> tuple[list[str], list[str | None], int]:
        """The whole answer of a non-streaming request in one reply (no message per step), batched all the same."""
        try:
            return await collect(self.chat_batch(job), job.n)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def image_batch(self, jobs: list[ImageJob]) -> list[list[str] | Exception]:
        return await asyncio.to_thread(self.engine.render_images, jobs)

    async def images(self, job: ImageJob) -> list[str]:
        """The job's images, drawn in one pipeline call with the concurrent image requests of the same size and
        settings (each image from its own seeded stream: the same images alone or batched)."""
        return image_result(await self.image_batch(job))


class RayBackend:
    """The ingress's way to the model replicas. A replica lost before it sent anything (any non-streaming request) is
    retried once on another; one lost mid-stream ends the stream with a clean error event (`replica_lost`, 503)."""

    def __init__(self, handle):
        self.handle = handle

    async def chat(self, job: ChatJob):
        for attempt in range(2):
            started = False
            try:
                async for deltas in self.handle.options(stream=True).chat.remote(job):
                    started = True
                    yield deltas
                return
            except RayActorError as error:
                if started or attempt == 1:
                    raise replica_lost(error) from error

    async def complete(self, job: ChatJob) -> tuple[list[str], list[str | None], int]:
        return await self._retried("complete", job)

    async def images(self, job: ImageJob) -> list[str]:
        return await self._retried("images", job)

    async def _retried(self, method: str, job):
        for attempt in range(2):
            try:
                return await getattr(self.handle, method).remote(job)
            except RayActorError as error:
                if attempt == 1:
                    raise replica_lost(error) from error


def replica_lost(error: Exception) -> OpenAIError:
    return OpenAIError(f"the model replica serving this request was lost ({type(error).__name__}); retry the request",
                       None, status=503, error_type="server_error", code="replica_lost")


@serve.deployment(name="LaVITIngress", max_ongoing_requests=256, graceful_shutdown_timeout_s=120)
@serve.ingress()
class LaVITIngress:
    """The OpenAI-compatible HTTP ingress (`create_app`), calling the model deployment."""

    def __init__(self, model_handle, settings: dict):
        self.settings = ServeSettings(**settings)
        limits = ServeLimits(**self.settings.limits)
        self.preparer = RequestPreparer(self.settings.model, limits, self.settings.allowed_local_media_path)
        self.backend = RayBackend(model_handle)
        self.limits = limits

    def __serve_build_asgi_app__(self):
        return create_app(self.preparer, self.backend, self.settings.served_name(), self.limits,
                          self.settings.request_timeout_s)


def build_app(args: dict):
    """The Ray Serve application for `ServeSettings(**args)` (the `import_path` of a `serve deploy` config)."""
    settings = ServeSettings(**args)
    ServeLimits(**settings.limits)  # unknown limit names fail here, not on the replicas
    device = "cuda" if settings.gpus_per_replica > 0 else "cpu"
    model = LaVITModelDeployment.options(
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        **replica_scaling(settings),
    ).bind(settings.model, device, settings.dtype, settings.max_batch_size, settings.batch_wait_timeout_s,
           settings.max_image_batch_size)
    return LaVITIngress.options(ray_actor_options={"num_cpus": 0}).bind(model, asdict(settings))


def replica_scaling(settings: ServeSettings) -> dict:
    """A fixed number of model replicas, or (`max_replicas` above `replicas`) Ray Serve's autoscaler between the two,
    aiming at `target_ongoing_requests` per replica."""
    if settings.max_replicas and settings.max_replicas < settings.replicas:
        raise ValueError(f"--max-replicas {settings.max_replicas} is below --replicas {settings.replicas} (the "
                         f"autoscaler's least): give --max-replicas of at least {settings.replicas}, or leave it out "
                         f"for a fixed number")
    if not settings.max_replicas or settings.max_replicas == settings.replicas:
        if settings.autoscaling:
            raise ValueError("autoscaling settings need max_replicas above replicas")
        return {"num_replicas": settings.replicas}
    return {"autoscaling_config": {**settings.autoscaling, "min_replicas": settings.replicas,
                                   "max_replicas": settings.max_replicas,
                                   "target_ongoing_requests": settings.target_ongoing_requests}}


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
               num_gpus: int | None = None, ready=None) -> None:
    """`lavit serve`: a local Ray instance, the application at http://host:port/, until SIGINT or SIGTERM; then the
    accepted requests finish before the replicas go (Ray Serve's graceful shutdown)."""
    import ray

    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    try:
        # the app answers a late request itself (408, OpenAI body); the proxy's own limit is only a backstop
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s + 30})
        serve.run(build_app(asdict(settings)), name="lavit", route_prefix="/")
        print(f"lavit serve: {settings.served_name()} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        if ready is not None:
            ready()
        while not stop:
            time.sleep(0.2)
    finally:
        # deleting the application first lets every replica finish the requests it accepted (up to
        # graceful_shutdown_timeout_s) while the HTTP proxy still holds their connections
        serve.delete("lavit", _blocking=True)
        serve.shutdown()
        ray.shutdown()
