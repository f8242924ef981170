from .apps.run import main

main()
