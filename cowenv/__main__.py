from cowenv.cli import run_main

run_main()
