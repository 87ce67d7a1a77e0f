// SPDX-License-Identifier: GPL-2.0
/*
 * A 32-bit blksnap client, built with `gcc -m32 -static` against the UAPI
 * headers of this repository: what an i386 backup agent on a 64-bit kernel
 * does. On i386 a __u64 is 4-byte aligned, so struct blkfilter_attach,
 * struct blksnap_cbtdirty and struct blksnap_snapshot_collect are smaller
 * than on x86_64, and so are the request numbers that encode their size.
 *
 * usage: client32 DISK STORE_DIR
 *
 * Attaches to DISK, reads the CBT, marks a range dirty, creates, takes and
 * destroys a snapshot, and prints what it saw as "key value" lines for the
 * guest test to compare with the 64-bit view. Exits 1 on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/blk-filter.h>
#include <linux/blksnap.h>

static int check(int ret, const char *what)
{
	if (ret < 0) {
		printf("error %s: %s\n", what, strerror(errno));
		exit(1);
	}
	return ret;
}

static int ctl(int fd, unsigned int cmd, void *opt, unsigned int optlen)
{
	struct blkfilter_ctl c;

	memset(&c, 0, sizeof(c));
	strcpy((char *)c.name, BLKSNAP_FILTER_NAME);
	c.cmd = cmd;
	c.opt = (uintptr_t)opt;
	c.optlen = optlen;
	return ioctl(fd, BLKFILTER_CTL, &c);
}

static void print_uuid(const char *key, const struct blksnap_uuid *id)
{
	printf("%s ", key);
	for (int i = 0; i < 16; i++)
		printf("%02x", id->b[i]);
	printf("\n");
}

int main(int argc, char **argv)
{
	struct blksnap_snapshot_collect collect;
	struct blksnap_snapshot_create create;
	struct blksnap_snapshot_event event;
	struct blksnap_snapshotinfo info;
	struct blksnap_snapshotadd add;
	struct blksnap_version version;
	struct blksnap_cbtinfo cbtinfo;
	struct blksnap_cbtdirty dirty;
	struct blksnap_sectors range;
	struct blkfilter_attach attach;
	struct blkfilter_detach detach;
	struct blksnap_cbtmap map;
	struct blksnap_uuid *ids;
	unsigned char *bytes;
	int disk, control;

	if (argc != 3) {
		fprintf(stderr, "usage: %s DISK STORE_DIR\n", argv[0]);
		return 2;
	}
	printf("sizeof_attach %zu\n", sizeof(struct blkfilter_attach));
	printf("sizeof_cbtdirty %zu\n", sizeof(struct blksnap_cbtdirty));
	printf("sizeof_collect %zu\n", sizeof(struct blksnap_snapshot_collect));
	printf("sizeof_cbtinfo %zu\n", sizeof(struct blksnap_cbtinfo));

	disk = check(open(argv[1], O_RDONLY | O_DIRECT), "open disk");
	memset(&attach, 0, sizeof(attach));
	strcpy((char *)attach.name, BLKSNAP_FILTER_NAME);
	if (ioctl(disk, BLKFILTER_ATTACH, &attach) < 0 && errno != EALREADY)
		check(-1, "BLKFILTER_ATTACH");
	printf("attach ok\n");

	memset(&cbtinfo, 0, sizeof(cbtinfo));
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_CBTINFO, &cbtinfo, sizeof(cbtinfo)),
	      "CBTINFO");
	printf("capacity %llu\n", (unsigned long long)cbtinfo.device_capacity);
	printf("block_size %u\n", cbtinfo.block_size);
	printf("block_count %u\n", cbtinfo.block_count);
	printf("changes_number %u\n", cbtinfo.changes_number);
	print_uuid("generation", &cbtinfo.generation_id);

	/* Mark sectors 0..127 and read the active map back. */
	range.offset = 0;
	range.count = 128;
	dirty.count = 1;
	dirty.dirty_sectors = (uintptr_t)&range;
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_CBTDIRTY, &dirty, sizeof(dirty)),
	      "CBTDIRTY");
	bytes = calloc(cbtinfo.block_count, 1);
	map.offset = 0;
	map.length = cbtinfo.block_count;
	map.buffer = (uintptr_t)bytes;
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_CBTMAP_ACTIVE, &map, sizeof(map)),
	      "CBTMAP_ACTIVE");
	printf("active_block0 %u\n", bytes[0]);

	control = check(open("/dev/" BLKSNAP_CTL, O_RDWR), "open control");
	check(ioctl(control, IOCTL_BLKSNAP_VERSION, &version), "VERSION");
	printf("version %u.%u\n", version.major, version.minor);

	memset(&create, 0, sizeof(create));
	create.diff_storage_limit_sect = 64 << 11;
	create.diff_storage_filename = (uintptr_t)argv[2];
	check(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_CREATE, &create),
	      "SNAPSHOT_CREATE");
	print_uuid("snapshot", &create.id);

	memset(&collect, 0, sizeof(collect));
	check(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &collect),
	      "SNAPSHOT_COLLECT size query");
	printf("collect_count %u\n", collect.count);
	ids = calloc(collect.count, sizeof(*ids));
	collect.ids = (uintptr_t)ids;
	check(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_COLLECT, &collect),
	      "SNAPSHOT_COLLECT");
	for (unsigned int i = 0; i < collect.count; i++)
		print_uuid("collected", &ids[i]);

	add.id = create.id;
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD, &add, sizeof(add)),
	      "SNAPSHOTADD");
	memset(&event, 0, sizeof(event));
	event.id = create.id;
	event.timeout_ms = 10;
	if (ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT, &event) == 0 ||
	    errno != ENOENT)
		check(-1, "SNAPSHOT_WAIT_EVENT (want ENOENT)");
	printf("wait_event ENOENT\n");
	check(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_TAKE, &create.id),
	      "SNAPSHOT_TAKE");
	memset(&info, 0, sizeof(info));
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO, &info, sizeof(info)),
	      "SNAPSHOTINFO");
	printf("error_code %d\n", info.error_code);
	printf("image %.32s\n", (char *)info.image);

	memset(&cbtinfo, 0, sizeof(cbtinfo));
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_CBTINFO, &cbtinfo, sizeof(cbtinfo)),
	      "CBTINFO after take");
	printf("changes_number_after %u\n", cbtinfo.changes_number);
	check(ctl(disk, BLKFILTER_CTL_BLKSNAP_CBTMAP, &map, sizeof(map)),
	      "CBTMAP");
	printf("snapshot_block0 %u\n", bytes[0]);

	check(ioctl(control, IOCTL_BLKSNAP_SNAPSHOT_DESTROY, &create.id),
	      "SNAPSHOT_DESTROY");
	memset(&detach, 0, sizeof(detach));
	strcpy((char *)detach.name, BLKSNAP_FILTER_NAME);
	check(ioctl(disk, BLKFILTER_DETACH, &detach), "BLKFILTER_DETACH");
	printf("detach ok\n");
	printf("done\n");
	return 0;
}
