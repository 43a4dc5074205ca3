"""The generation role: prompt batches in (Redis stream), rollout groups out (the judges' queue), weights live.

`worker.py` is the role (loop, weight sync, heartbeat); `engines.py` the samplers behind one interface (vLLM, plain
transformers) and `engine_hf_fast.py` the CUDA-graphed transformers one, picked by `factory.py`; `weights.py`
receives weights (a collective, or the learner's shared buffers) and holds the vLLM worker extension that loads
them; `vllm_reload.py` the in-place load of vLLM's CPU build; `config.py` the role's typed settings.
"""
