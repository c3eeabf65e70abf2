"""The paper's TTFT setting: 5 agents, 512-token prefixes, 1K-token inputs, 512 output tokens, always reuse."""

from kvcomm_jax.bench.ttft import TTFTSettings


def config() -> TTFTSettings:
    return TTFTSettings(agents=5, prefix_tokens=512, input_tokens=1024, output_tokens=512, samples=5, gamma=1.0)
