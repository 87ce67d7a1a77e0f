// SPDX-License-Identifier: GPL-2.0
/*
 * Prints the layout facts of our UAPI headers in the format of
 * upstream-uapi-layout.txt: built and compared by blk_snap/tests/uapi.rs.
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/blk-filter.h>
#include <linux/blksnap.h>

#define SIZE(s) printf("sizeof %s %zu\n", #s, sizeof(struct s))
#define OFF(s, f) printf("offsetof %s.%s %zu\n", #s, #f, offsetof(struct s, f))
#define IOCTL(n) printf("ioctl %s 0x%x\n", #n, (unsigned int)(n))

/* Our extensions, compared with the Rust mirrors only. */
static void extensions(void)
{
	SIZE(blksnap_snapshot_create_storage);
	OFF(blksnap_snapshot_create_storage, flags);
	OFF(blksnap_snapshot_create_storage, limit_sect);
	OFF(blksnap_snapshot_create_storage, id);
	SIZE(blksnap_snapshot_append_storage);
	OFF(blksnap_snapshot_append_storage, bdev_path);
	OFF(blksnap_snapshot_append_storage, count);
	OFF(blksnap_snapshot_append_storage, reserved);
	OFF(blksnap_snapshot_append_storage, ranges);
	SIZE(blksnap_event_low_free_space);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_CREATE_STORAGE);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE);
	SIZE(blksnap_cbtfine);
	OFF(blksnap_cbtfine, block_shift);
	OFF(blksnap_cbtfine, reserved);
	OFF(blksnap_cbtfine, offset);
	OFF(blksnap_cbtfine, count);
	OFF(blksnap_cbtfine, buffer);
	OFF(blksnap_cbtfine, memory);
	OFF(blksnap_cbtfine, memory_limit);
	printf("enum CBTMAP_ACTIVE %d MEMORY %d DEVICES %d low_free_space %d\n",
	       BLKFILTER_CTL_BLKSNAP_CBTMAP_ACTIVE, BLKSNAP_STORAGE_MEMORY,
	       BLKSNAP_STORAGE_DEVICES, blksnap_event_code_low_free_space);
	printf("enum CBTFINE %d CLEAN %d WRITTEN %d UNKNOWN %d\n",
	       BLKFILTER_CTL_BLKSNAP_CBTFINE, BLKSNAP_FINE_CLEAN,
	       BLKSNAP_FINE_WRITTEN, BLKSNAP_FINE_UNKNOWN);
	SIZE(blksnap_cbtpersist);
	OFF(blksnap_cbtpersist, flags);
	OFF(blksnap_cbtpersist, restored);
	OFF(blksnap_cbtpersist, generation);
	OFF(blksnap_cbtpersist, identity);
	OFF(blksnap_cbtpersist, writes_before);
	OFF(blksnap_cbtpersist, proof);
	OFF(blksnap_cbtpersist, reserved);
	SIZE(blksnap_cbt_state_device);
	OFF(blksnap_cbt_state_device, flags);
	OFF(blksnap_cbt_state_device, reserved);
	OFF(blksnap_cbt_state_device, records);
	OFF(blksnap_cbt_state_device, clean);
	SIZE(blksnap_cbt_save);
	OFF(blksnap_cbt_save, reserved);
	OFF(blksnap_cbt_save, bytes);
	IOCTL(IOCTL_BLKSNAP_CBT_STATE_DEVICE);
	IOCTL(IOCTL_BLKSNAP_CBT_SAVE);
	printf("enum CBTPERSIST %d FORMAT %d MIRROR %d UNVERIFIED %d\n",
	       BLKFILTER_CTL_BLKSNAP_CBTPERSIST, BLKSNAP_CBT_STATE_FORMAT,
	       BLKSNAP_CBT_STATE_MIRROR, BLKSNAP_CBTPERSIST_UNVERIFIED);
	printf("enum PROOF %d %d %d %d %d\n", BLKSNAP_CBT_PROOF_NONE,
	       BLKSNAP_CBT_PROOF_EXT, BLKSNAP_CBT_PROOF_XFS,
	       BLKSNAP_CBT_PROOF_BTRFS, BLKSNAP_CBT_PROOF_PARTITIONS);
}

int main(int argc, char **argv __attribute__((unused)))
{
	if (argc > 1) {
		extensions();
		return 0;
	}
	SIZE(blkfilter_attach);
	OFF(blkfilter_attach, opt);
	OFF(blkfilter_attach, optlen);
	SIZE(blkfilter_detach);
	SIZE(blkfilter_ctl);
	OFF(blkfilter_ctl, cmd);
	OFF(blkfilter_ctl, optlen);
	OFF(blkfilter_ctl, opt);
	SIZE(blksnap_uuid);
	SIZE(blksnap_cbtinfo);
	OFF(blksnap_cbtinfo, block_size);
	OFF(blksnap_cbtinfo, block_count);
	OFF(blksnap_cbtinfo, generation_id);
	OFF(blksnap_cbtinfo, changes_number);
	SIZE(blksnap_cbtmap);
	OFF(blksnap_cbtmap, length);
	OFF(blksnap_cbtmap, buffer);
	SIZE(blksnap_sectors);
	SIZE(blksnap_cbtdirty);
	OFF(blksnap_cbtdirty, dirty_sectors);
	SIZE(blksnap_snapshotadd);
	SIZE(blksnap_snapshotinfo);
	OFF(blksnap_snapshotinfo, image);
	SIZE(blksnap_version);
	SIZE(blksnap_snapshot_create);
	OFF(blksnap_snapshot_create, diff_storage_filename);
	OFF(blksnap_snapshot_create, id);
	SIZE(blksnap_snapshot_collect);
	OFF(blksnap_snapshot_collect, ids);
	SIZE(blksnap_snapshot_event);
	OFF(blksnap_snapshot_event, timeout_ms);
	OFF(blksnap_snapshot_event, code);
	OFF(blksnap_snapshot_event, time_label);
	OFF(blksnap_snapshot_event, data);
	SIZE(blksnap_event_corrupted);
	SIZE(blksnap_event_no_space);
	IOCTL(BLKFILTER_ATTACH);
	IOCTL(BLKFILTER_DETACH);
	IOCTL(BLKFILTER_CTL);
	IOCTL(IOCTL_BLKSNAP_VERSION);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_CREATE);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_DESTROY);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_TAKE);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_COLLECT);
	IOCTL(IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT);
	printf("enum CBTINFO %d CBTMAP %d CBTDIRTY %d SNAPSHOTADD %d SNAPSHOTINFO %d\n",
	       BLKFILTER_CTL_BLKSNAP_CBTINFO, BLKFILTER_CTL_BLKSNAP_CBTMAP,
	       BLKFILTER_CTL_BLKSNAP_CBTDIRTY, BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD,
	       BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO);
	printf("events corrupted %d no_space %d\n", blksnap_event_code_corrupted,
	       blksnap_event_code_no_space);
	printf("names %s %s\n", BLKSNAP_CTL, BLKSNAP_FILTER_NAME);
	return 0;
}
