"""topx on AWS: the deployed pipeline's stages (stages), the DynamoDB store readers and the loader write
(store), and the client a user calls (client). Names and keys they share with infra/ are topx.contract's."""
