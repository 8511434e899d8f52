"""Bad command lines and job files refused by the command table (`jaxreshard.commands`): keys of another task,
unknown keys, two spellings of one option, values of the wrong kind or out of bounds, missing required options.
Each is refused before any file is read, with one line naming the flag, or the job file and its key."""

from __future__ import annotations

from pathlib import Path

from jaxreshard.caps import MAX_PROCESSES, MAX_RANKS

from .harness import Case, corpus_test

JOB = ["--config", "{tmp}/job.yaml"]
CONVERT = ["convert", "--src", "{llama}", "--dst", "{tmp}/out"]


def job(text: str):
    """Setup writing {tmp}/job.yaml (SRC and DST stand for the example checkpoint and {tmp}/out)."""
    def setup(tmp: Path) -> None:
        (tmp / "job.yaml").write_text(text.replace("SRC", str(tmp / "llama")).replace("DST", str(tmp / "out")))
    return setup


CONVERT_JOB = "task: convert\nsrc: SRC\ndst: DST\n"

CASES = [
    # keys of another task, unknown keys
    Case("job-key-of-merge-lora", JOB, 2, r"job\.yaml: unknown keys \['adapter'\] for task convert \(adapter is an "
         r"option of merge-lora, not of convert\); valid keys are task, src, dst", job(CONVERT_JOB + "adapter: a\n")),
    Case("job-key-of-unify-in-plan", JOB, 2, r"unknown keys \['has_redundancy'\] for task plan \(has_redundancy is an "
         r"option of unify, not of plan\)", job("task: plan\nsrc: SRC\nhas_redundancy: true\n")),
    Case("job-key-of-convert-in-quickstart", JOB, 2, r"unknown keys \['src'\] for task quickstart \(src is an option "
         r"of convert, plan, inspect, strategy, merge-lora, unify, verify, not of quickstart\); valid keys are task, "
         r"workdir, layouts, overwrite, quiet$", job("task: quickstart\nsrc: SRC\n")),
    Case("job-resume-in-plan", JOB, 2, r"unknown keys \['resume'\] for task plan \(resume is an option of convert",
         job("task: plan\nsrc: SRC\nresume: true\n")),
    Case("job-dashed-key", JOB, 2, r"unknown keys \['dst-layout'\] for task convert; valid keys are task, src, dst, "
         r"src_layout, dst_layout", job(CONVERT_JOB + "dst-layout: x.yaml\n")),
    Case("job-task-unknown", JOB, 2, r"job\.yaml: task 'split' is unknown; use one of convert, plan, inspect, "
         r"strategy, merge-lora, unify, quickstart, verify", job("task: split\nsrc: SRC\n")),
    Case("job-not-a-mapping", JOB, 2, r"job\.yaml: a job config must be a mapping", job("- convert\n")),
    # two spellings of one option
    Case("workers-and-process-num", CONVERT + ["--workers", "2", "--process-num", "2"], 2,
         r"^jaxreshard: error: give --workers or --process-num, not both$"),
    Case("job-workers-and-process-num", JOB, 2, r"job\.yaml: give workers or process_num, not both",
         job(CONVERT_JOB + "workers: 2\nprocess_num: 2\n")),
    Case("verify-positional-and-dst", ["verify", "{llama}", "--dst", "{llama}"], 2,
         r"verify: give the checkpoint to check as a positional argument or as --dst, not both"),
    Case("config-and-subcommand", ["--config", "{tmp}/job.yaml", "plan", "--src", "{llama}"], 2,
         r"give either --config or a subcommand, not both", job(CONVERT_JOB)),
    # values of the wrong kind or out of bounds
    Case("workers-zero", CONVERT + ["--workers", "0"], 2,
         rf"--workers must be an integer in 1\.\.{MAX_PROCESSES}, got 0"),
    Case("workers-word", CONVERT + ["--workers", "two"], 2, r"--workers must be an integer, got 'two'"),
    Case("job-process-num-float", JOB, 2, r"job\.yaml: process_num must be an integer, got '2\.0'",
         job(CONVERT_JOB + "process_num: 2.0\n")),
    Case("job-workers-bool", JOB, 2, r"job\.yaml: workers must be an integer, got 'True'",
         job(CONVERT_JOB + "workers: true\n")),
    Case("job-num-processes-huge", JOB, 2,
         rf"job\.yaml: num_processes must be an integer in 1\.\.{MAX_RANKS}, got 99999",
         job(CONVERT_JOB + "num_processes: 99999\n")),
    Case("job-process-id-negative", JOB, 2,
         rf"job\.yaml: process_id must be an integer in 0\.\.{MAX_RANKS - 1}, got -1",
         job(CONVERT_JOB + "process_id: -1\n")),
    Case("job-lora-scaling-inf", JOB, 2, r"job\.yaml: lora_scaling must be a finite number, got 'inf'",
         job("task: merge-lora\nsrc: SRC\ndst: DST\nlora_scaling: .inf\n")),
    Case("job-max-file-size-zero", JOB, 2, r"job\.yaml: max_file_size must be at least 1 byte, got '0'",
         job(CONVERT_JOB + "hf: true\nmax_file_size: 0\n")),
    Case("max-file-size-words", CONVERT + ["--max-file-size", "big"], 2,
         r"size 'big' is not understood; write e\.g\. 5GB"),
    Case("has-redundancy-maybe", ["unify", "--src", "{llama}", "--dst", "{tmp}/out", "--has-redundancy", "maybe"], 2,
         r"--has-redundancy must be true or false, got 'maybe'"),
    Case("job-overwrite-string", JOB, 2, r"job\.yaml: overwrite must be true or false, got 'yes'",
         job(CONVERT_JOB + "overwrite: 'yes'\n")),
    Case("job-prefix-list", JOB, 2, r"job\.yaml: prefix must be a single value, got a list \['a', 'b'\]",
         job(CONVERT_JOB + "prefix: [a, b]\n")),
    Case("job-ranks-beyond-cap", JOB, 2, rf"--ranks '0-99999': rank 99999 is beyond the cap of {MAX_RANKS} ranks",
         job(CONVERT_JOB + "ranks: 0-99999\n")),
    Case("job-layouts-mapping", JOB, 2, r"job\.yaml: layouts must be a list of values",
         job("task: quickstart\nlayouts: {a: 1}\n")),
    # missing required options
    Case("convert-without-dst", ["convert", "--src", "{llama}"], 2,
         r"^jaxreshard: error: missing required option\(s\) --dst$"),
    Case("strategy-without-layout-and-out", ["strategy", "--src", "{llama}"], 2,
         r"missing required option\(s\) --layout, --out$"),
    Case("job-merge-lora-without-dst", JOB, 2, r"job\.yaml: missing required key\(s\) dst$",
         job("task: merge-lora\nsrc: SRC\ndst: null\n")),
    Case("job-without-src", JOB, 2, r"job\.yaml: missing required key\(s\) src$", job("dst: DST\n")),
]

test_case = corpus_test(CASES)
