from mistral_deploy.cli import main

main()
