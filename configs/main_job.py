"""The main job (``python run.py`` with no arguments): a 4-agent GSM8K pipeline, dense and KVCOMM.

Questions run in batches (each agent's calls for a batch are one step), so the job covers
enough questions for the anchor pools to fill and reuse to reach its steady state.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PipelineJob:
    task: str = "gsm8k"
    agents: int = 4
    mode: str = "both"
    limit: int = 16
    batch_size: int = 8
    max_new_tokens: int = 96
    json: str = "results/main.json"
    plot: str = "results/main_ttft.png"

    def argv(self) -> list[str]:
        """The equivalent ``run.py pipeline`` arguments."""
        return [
            "pipeline", "--task", self.task, "--agents", str(self.agents), "--mode", self.mode,
            "--limit", str(self.limit), "--batch-size", str(self.batch_size), "--max-new-tokens", str(self.max_new_tokens),
            "--json", self.json, "--plot", self.plot,
        ]


def config() -> PipelineJob:
    return PipelineJob()
