"""The processes of a one-machine run: how `rlq train` starts each role, and the workers `rlq scale` adds later.

Every role is `python -m rlq ...` with the run's saved config, so what the launcher runs is what a user would type
(rlq/supervisor.py keeps each command in `<run_dir>/logs/commands.txt`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from broker.acl import GENERATE, INSPECT, JUDGE, LEARNER
from rlq.config import RunConfig, local_cpu_list
from rlq.errors import UserError
from rlq.placement import Placement, cuda_visible
from rlq.supervisor import RoleSpec


class RunRoles:
    """Builds the RoleSpecs of a run: judges, generation workers, the learner and the optional metrics endpoint.

    Raises UserError (one line) at construction when a CPU list names CPUs this machine does not have."""

    def __init__(self, cfg: RunConfig, config_path: Path, placement: Placement | None = None) -> None:
        self.cfg, self.placement = cfg, placement
        self.python = sys.executable
        self.base = ["--config", str(config_path)]
        cluster = cfg.cluster
        try:  # validated here, on the machine that pins, not when each role reads the config
            self.learner_cpus = local_cpu_list(cluster.learner_cpus, "cluster.learner_cpus") if cluster.learner_cpus \
                else None  # fmt: skip
            self.judge_cpus = local_cpu_list(cluster.judge_cpus, "cluster.judge_cpus") if cluster.judge_cpus else None
            self.generation_cpus = [local_cpu_list(text, "cluster.generation_cpus")
                                    for text in cluster.generation_cpu_lists()]  # fmt: skip
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.config_path = config_path

    def initial(self) -> list[RoleSpec]:
        """The roles in start order (judges first: nothing waits on an empty queue; the learner last).

        With a placement, each role sees only its GPUs; a worker that shares its GPU takes the colocated memory
        share and must be ready (engine loaded) before anything else starts on that GPU (`RoleSpec.wait_ready`)."""
        specs = [self.judge(0)]
        specs += [self.generate(index) for index in range(self.cfg.cluster.generation_workers)]
        specs.append(self.learner())
        metrics = self.metrics()
        return [metrics, *specs] if metrics else specs  # first: it watches the others start

    def judge(self, index: int) -> RoleSpec:
        """One Celery judge process with `cluster.judge_workers` pool processes (index 0 is named plain "judge")."""
        argv = [self.python, "-m", "rlq", "worker", "judge", *self.base,
                "--concurrency", str(self.cfg.cluster.judge_workers)]  # fmt: skip
        return RoleSpec("judge" if index == 0 else f"judge-{index}", argv, cpus=self.judge_cpus, restart=True,
                        kind="judge", redis_user=JUDGE)  # fmt: skip

    def can_add_generation(self, index: int) -> str:
        """Why generation worker `index` cannot be started here, or "" (a GPU run places workers up front)."""
        gpu_run = self.placement is not None and any(self.placement.generation)
        if gpu_run and index >= len(self.placement.generation):  # type: ignore[union-attr]
            return (f"the placement has GPUs for {len(self.placement.generation)} generation workers "
                    f"(cluster.generation_gpus); start more on other nodes with `rlq worker generate`")  # fmt: skip
        return ""

    def generate(self, index: int) -> RoleSpec:
        """Generation worker `index`: pinned to its CPU list (round robin) and, on GPUs, to its placement."""
        cfg, placement = self.cfg, self.placement
        # The whole worker is pinned (its vLLM engine process inherits it), and vLLM binds its OpenMP threads to
        # the same CPUs instead of picking its own, which may be the learner's.
        cpus = self.generation_cpus[index % len(self.generation_cpus)] if self.generation_cpus else None
        engine_env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))} if cpus else {}
        extra: list[str] = []
        gpus = placement.generation[index] if placement is not None and index < len(placement.generation) else None
        shared = placement is not None and bool(gpus) and placement.shared(index)  # gpus: index is placed
        if gpus:
            engine_env["CUDA_VISIBLE_DEVICES"] = cuda_visible(gpus)
        if shared:
            share = cfg.policy.generation.vllm_cfg.colocated_gpu_memory_utilization
            extra.append(f"policy.generation.vllm_cfg.gpu_memory_utilization={share}")
        worker_id = f"{cfg.run_name}-gen-{index}"
        argv = [self.python, "-m", "rlq", "worker", "generate", *self.base, "--worker-id", worker_id, *extra]
        return RoleSpec(f"generate-{index}", argv, env=engine_env, cpus=cpus, wait_ready=worker_id if shared else None,
                        restart=True, kind="generate", redis_user=GENERATE)  # fmt: skip

    def learner(self) -> RoleSpec:
        cluster = self.cfg.cluster
        argv = [self.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={cluster.learner_procs_per_node}", "-m", "rlq", "learner", *self.base]  # fmt: skip
        env = {}
        if self.placement is not None and self.placement.learner:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible(self.placement.learner)
        if self.learner_cpus:
            # Threads per rank from the pinned set: more would fight over the same cores (OpenMP spins while waiting).
            env["OMP_NUM_THREADS"] = str(max(1, len(self.learner_cpus) // cluster.learner_procs_per_node))
        transport = self.cfg.weight_sync.transport
        if self.cfg.broker.url is None and transport.kind == "collective" and transport.addr is None:
            # A private broker is loopback only, so every worker of the run is on this host: the weight group's
            # store need not listen anywhere else.
            argv.append("weight_sync.transport.addr=127.0.0.1")
        resume = cluster.restarts.learner == "resume"  # it resumes from its latest checkpoint on every start
        return RoleSpec("learner", argv, env=env, finishes_run=True, cpus=self.learner_cpus, restart=resume,
                        redis_user=LEARNER)  # fmt: skip

    def metrics(self) -> RoleSpec | None:
        """The Prometheus endpoint as a role of the run (`logger.prometheus_port`), or None."""
        if self.cfg.logger.prometheus_port is None:
            return None
        from rlq.metrics_server import metrics_role_argv

        argv = metrics_role_argv(self.config_path, self.cfg.logger.prometheus_port, self.cfg.logger.prometheus_addr)
        return RoleSpec("metrics", argv, restart=True, redis_user=INSPECT)


def role_specs(cfg: RunConfig, config_path: Path, placement: Placement | None = None) -> list[RoleSpec]:
    """The processes of a one-machine run, in start order (RunRoles.initial)."""
    return RunRoles(cfg, config_path, placement).initial()
