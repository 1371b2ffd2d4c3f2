"""ORBION's load tool (``orbion loadtest``) and system benchmark (``orbion bench``).

schedule.py   open-loop arrival times          scenarios.py  simulated contacts and due replies
stats.py      percentiles, loss/duplicate accounting   runner.py  drives a system through a step
stack.py      starts a whole system with fakes  fakes.py      instrumented fakes (processes)
report.py     JSON / Markdown / PNG output      cli.py        the command line
bench.py      `orbion bench`: the plan's before/after figures
"""
