"""Resource requests no Ray can satisfy: refused before Ray by the jobs and by the CLI alike."""

from __future__ import annotations

#: case -> (arguments, text of the one-line error)
RESOURCE_CASES: dict[str, tuple[list[str], str]] = {
    "fractional gpus above one": (
        ["--set", "embed.settings.pixels.num_gpus=1.5"], "Ray only splits a GPU below 1"),
    "gpus on a cpu device": (
        ["--set", "embed.device=cpu", "--set", "embed.settings.vit.num_gpus=1"],
        "but embed.device is cpu"),
    "pools larger than the local ray": (
        ["--set", "ray.num_gpus=1", "--set", "embed.defaults.num_gpus=1",
         "--set", "embed.models=[pixels,efficientnet-lite0]"], "need 2 GPUs at once"),
    "cpu pools larger than the local ray": (
        ["--set", "ray.num_cpus=4", "--set", "embed.defaults.num_cpus=2",
         "--set", "embed.models=[pixels,efficientnet-lite0]"], "need 4 CPUs at once"),
    "actor wider than the local ray": (
        ["--set", "ray.num_cpus=2", "--set", "embed.settings.pixels.num_cpus=4"],
        "num_cpus=4 per actor"),
}
