from mrivq.cli import main

main()
