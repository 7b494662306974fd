from bench.qualityset import main

main()
