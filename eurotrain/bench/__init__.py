"""``eurotrain bench``: measure what an allocation delivers (collective bandwidths, training
throughput and MFU at 1..N nodes) and report it as Markdown and plots.

    eurotrain bench comms   per rank, under srun or torchrun: all-reduce, all-gather,
                            reduce-scatter, all-to-all and send/recv over message sizes
    eurotrain bench train   a node sweep of the same model inside one allocation (srun -N k
                            for each size) or one job per size (--submit)
    eurotrain bench report  Markdown + PNG plots of one or more result directories

Results follow one JSON format (results.py), which ``eurotrain plan --calibrate`` also reads.
"""
