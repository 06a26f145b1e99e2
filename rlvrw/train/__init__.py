"""Training the video world model: MLE pre-training (``pretrain``), GRPO post-training (``trainer``), evaluation
(``evaluate``), the whole pipeline (``pipeline``, ``rlvrw train``) and the experiments (``experiment``), and the pieces
they share: the run loop of every stage (``run_loop``), what a run builds (``build``), tokenizing episodes into token
caches (``tokenize``), run checkpoints that resume exactly (``checkpoints``), data parallelism under torchrun
(``distributed``), run logs (``logging``), run settings as dataclasses and command lines (``config``) and the sampler
(``rollout``). ``docs/architecture.md`` maps them."""
