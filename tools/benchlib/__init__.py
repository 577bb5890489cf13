"""tools/bench.py's jobs, one module each (bench.py keeps the command line and the table):

    env         the run's grids, shapes and limits; its device, dtype and host-lane costs
    plan        a bench row's plan and the offloading modes' GPU budget at a grid point
    timing      timing a decode step, whole and its host share
    check       correctness against the reference, every mode
    latency     one latency grid point, every mode
    throughput  issue 6's throughput rows (weights and cache in CPU memory)
    profiling   a torch.profiler trace of one decode step, summarised
    hf          transformers' offloaded cache on the same shape
"""
